"""Reading the ledger: summaries, the weekly report's figures, periods, the HTML report."""
