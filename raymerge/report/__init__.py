"""Reports of a finished sweep: leaderboard, CSV, HTML with plots."""
