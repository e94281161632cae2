"""``python -m citynerve.workloads.ingest``: the ingestion worker of a SensorFleet."""

import sys

from citynerve.workloads.ingest.worker import main

sys.exit(main())
