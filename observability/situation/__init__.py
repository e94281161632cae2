"""The hub's situation map: cities on a map of China with their health, and the incident list."""

from citynerve.observability.situation.picture import HubReader, situation_picture
from citynerve.observability.situation.server import PictureFeed, SituationServer, serve_hub

__all__ = ["HubReader", "PictureFeed", "SituationServer", "serve_hub", "situation_picture"]
