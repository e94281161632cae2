"""`make demo`: the federation story on the local federation (see ``story``)."""

from __future__ import annotations

import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

from citynerve.operators.demo.story import Story

OUTPUT = Path("demo-output")


def run(state_dir: Path | None = None, keep: bool = False, quick: bool = False, output: Path = OUTPUT) -> int:
    """Play the story; tear everything down afterwards unless ``keep`` (then wait for Ctrl-C)."""

    def _interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    story = Story(state_dir, quick)
    code = 0
    try:
        story.play(output)
        if keep:
            print("\nEverything keeps running (operators in this process); press Ctrl-C to stop.", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("\ninterrupted; tearing down", flush=True)
    except Exception:  # noqa: BLE001 - the story failed: say where, then tear down
        traceback.print_exc()
        print("\nthe demo failed (see above); tearing everything down", file=sys.stderr, flush=True)
        code = 1
    finally:
        story.teardown()
        print("local federation stopped", flush=True)
    return code
