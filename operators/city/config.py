"""What a city operator is started with, besides where it connects (``OperatorOptions``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import version
from typing import TYPE_CHECKING, Literal

from citynerve.models.places import city_centre
from citynerve.operators import images

if TYPE_CHECKING:
    from citynerve.operators.city.broker import BrokerOptions

WorkloadMode = Literal["local", "kuberay"]

MANAGED_BY = "citynerve-city-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_FLEET = "citynerve.io/sensorfleet"
LABEL_SCENARIO = "citynerve.io/scenario"
LABEL_REVISION = "citynerve.io/workload-revision"
ANNOTATION_NOTIFIED = "citynerve.io/notified"
# The MLflow run that recorded what the workload scored when it detected an Incident
# (citynerve.models.scenario_runs); absent when the operator runs without --mlflow-url.
ANNOTATION_MLFLOW_RUN = "citynerve.io/mlflow-run-id"


def centre_of(city: str) -> tuple[str, str] | None:
    """A city's centre as Incident coordinates (decimal-degree strings), from the platform's one table
    (``citynerve.models.places``); None for a city it does not list, which is never given 0, 0."""
    centre = city_centre(city)
    return None if centre is None else (f"{centre[0]:.4f}", f"{centre[1]:.4f}")


@dataclass(frozen=True)
class AlertPolicy:
    """Which addresses an alert route may deliver to (the city chart's ``alerts`` values).

    Loopback is refused by default: a route to 127.0.0.1 reaches the operator's own pod.
    Private networks are allowed by default, since receivers live in the city's network.
    Link-local and cloud-metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254,
    100.100.100.200 …) are refused unless ``allow_link_local`` is set on its own; the
    cluster's API server, unspecified, multicast and reserved addresses are always refused.
    """

    allow_loopback: bool = False
    allow_private_networks: bool = True
    allow_link_local: bool = False


@dataclass(frozen=True)
class CityOptions:
    """City-specific settings of the operator."""

    city: str  # the City this operator's cluster is; no default, so no city joins as another
    mlflow_url: str | None = None
    workload_mode: WorkloadMode = "local"
    # The image of the children it creates (fleets' ingest, RayJobs): the one CityNerve image,
    # the chart passes its own (docs/images.md).
    image: str = field(default_factory=images.reference)
    # The Secrets alert routes may name in secretRef (the city chart's alerts.secretNames, the
    # only Secrets its RBAC lets the operator read); a route naming another is refused.
    alert_secrets: tuple[str, ...] = ()
    # The Ray a RayJob's cluster runs: the one installed here, which the image carries.
    ray_version: str = field(default_factory=lambda: version("ray"))
    # Re-resolution of model aliases, freshness of fleet data, retries after errors.
    resync_seconds: float = 30.0
    # How long a resolved model is trusted before it is downloaded and verified again.
    model_cache_seconds: float = 30.0
    webhook_timeout_seconds: float = 5.0
    # A failed alert delivery is retried per (incident, route) after 5, 10, 20 … s, at most this apart.
    alert_retry_seconds: float = 5.0
    alert_retry_max_seconds: float = 300.0
    alert_policy: AlertPolicy = AlertPolicy()
    # The city broker (NATS with JetStream) the fleets' readings travel on; None: no data plane,
    # and every fleet says so.
    broker: BrokerOptions | None = None
    # Each fleet's window history volume (a PersistentVolumeClaim per fleet): size and class.
    history_storage: str = "1Gi"
    history_storage_class: str | None = None

    @property
    def centre(self) -> tuple[str, str] | None:
        return centre_of(self.city)
