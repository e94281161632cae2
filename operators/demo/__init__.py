"""`make demo`: the federation story on the local federation (see ``story``)."""

from __future__ import annotations

import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

from citynerve.observability.logs import configure_logging
from citynerve.operators.demo.story import Story
from citynerve.operators.localfed.federation import LocalFederation

OUTPUT = Path("demo-output")


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM end the demo through its teardown.

    SIGINT too: a shell starts a background job with SIGINT ignored. Ray's core worker installs
    a native SIGTERM handler that ends the process at once, skipping every teardown; this puts
    ours back, so it runs after every step (on the main thread, where the story runs).
    """

    def _interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


def fresh_state(state_dir: Path | None) -> Path:
    """The demo's state folder, emptied of an earlier run; refused while a federation runs from it."""
    federation = LocalFederation(state_dir)
    running = federation.running_components()
    if running:
        msg = (f"a local federation is running from {federation.state_dir} ({', '.join(running[:3])} …); "
               f"stop it with `citynerve dev down --state-dir {federation.state_dir}` or give the demo "
               "another --state-dir")
        raise RuntimeError(msg)
    if federation.state_dir.exists():
        shutil.rmtree(federation.state_dir)
    return federation.state_dir


def run(state_dir: Path | None = None, keep: bool = False, quick: bool = False, output: Path = OUTPUT) -> int:
    """Play the story on fresh state; tear everything down afterwards unless ``keep`` (then wait
    for Ctrl-C or SIGTERM, and tear down then)."""
    _stop_on_signals()
    # The story is the output; the operators hosted here say only what needs attention.
    configure_logging("WARNING")
    try:
        state = fresh_state(state_dir)
    except RuntimeError as exc:
        print(f"the demo did not start: {exc}", file=sys.stderr, flush=True)
        return 2
    story = Story(state, quick, after_step=_stop_on_signals)
    code = 0
    try:
        story.play(output)
        if keep:
            _stop_on_signals()
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
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        story.teardown()
        print("local federation stopped", flush=True)
    return code
