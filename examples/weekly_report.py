"""Write last week's report from Python (e.g. from a scheduler such as APScheduler or Celery beat).

    python examples/weekly_report.py [LEDGER] [OUTPUT_DIR]

The cron equivalent is in weekly_report.cron. With no arguments this reads ./llmtally.db (run
`llmtally demo --db llmtally.db` first to have something to look at) and writes into ./reports/.
"""

from __future__ import annotations

import sys

from llmtally import Tally


def main() -> None:
    ledger = sys.argv[1] if len(sys.argv) > 1 else "llmtally.db"
    output = sys.argv[2] if len(sys.argv) > 2 else "reports/"
    with Tally(ledger) as tally:
        path = tally.report(output, week="last")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
