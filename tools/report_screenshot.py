#!/usr/bin/env python3
"""Open a run's ``report.html`` in headless Chromium, check that every picture loaded and the page
logged no error, and save a screenshot as ``RUN_DIR/report/screenshot.png`` (for the README).

    python tools/report_screenshot.py runs/demo [--out shot.png] [--width 1400 --height 3000]

Uses :func:`densedet.run_report.check_in_browser`, as the slow test does. Needs Chromium
(Debian: ``apt-get install chromium``). Exit code 1 when a picture is broken or the page logged an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from densedet.run_report import REPORT_FOLDER, check_in_browser  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a folder holding report.html (a training run, or densedet eval --report DIR)")
    parser.add_argument("--out", help=f"the screenshot (default RUN_DIR/{REPORT_FOLDER}/screenshot.png)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args()
    html = Path(args.run_dir) / "report.html"
    if not html.is_file():
        print(f"report_screenshot: {html} does not exist (written at the end of densedet train, or by "
              f"densedet eval --weights CKPT --report DIR)", file=sys.stderr)
        return 2
    try:
        result = check_in_browser(html, args.out or Path(args.run_dir) / REPORT_FOLDER / "screenshot.png",
                                  window=(args.width, args.height))
    except (FileNotFoundError, RuntimeError) as err:
        print(f"report_screenshot: {err}", file=sys.stderr)
        return 2
    print(f"{html}: {result['check']}; screenshot {result['screenshot']}")
    for line in result["error_messages"] + result["console"]:
        print(f"  {line}")
    return 0 if result["broken"] == 0 and result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
