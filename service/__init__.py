"""The ranking service (FastAPI on ONNX Runtime). Imports the core and analysis; never torch, training or cli.

    app            the app factory: routes, error handlers, the lifespan
    front          POST /v1/rank answered in front of FastAPI's stack; the one body reader
    settings       the service's settings, validated once at start
    request        a rank body (JSON or Arrow) to one checked request
    ranker         POST /v1/rank: features, the model call, scores, the response
    features       online features: an in-process cache of encoded rows in front of Redis
    inference      the ONNX Runtime session (CUDA with I/O binding, or CPU)
    triton         the model call on a Triton Inference Server instead
    models         which version serves; hot swaps
    experiments    A/B experiments: definitions in Redis, the live one in every process
    impressions    impressions and feedback joined into training examples
    feedback       POST /v1/feedback bodies
    keys           every Redis key the service writes
    schema         the OpenAPI description of the bodies
    errors         the HTTP errors (status, field, reason)
    observability  Prometheus metrics and JSON logs
"""
