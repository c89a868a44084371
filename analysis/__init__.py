"""Offline analysis: statistics, reports and model comparisons. Imports the core only.

    abstats   A/B statistics: per-arm metrics with user-level confidence intervals
    abreport  A/B event logs in, a terminal table out
    chart     the A/B report's PNG (matplotlib: a tool, never imported by the service)
    evaluate  `watchnext evaluate`: one version on held-out examples
    compare   `watchnext compare`: two versions on the same examples, paired-bootstrap intervals
"""
