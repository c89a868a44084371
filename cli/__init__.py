"""The `watchnext` command line: the top of the house, it may import every other package.

    main   the parser, train, evaluate, models, simulate
    serve  serve, up, features load
    stack  `watchnext up`: Redis, the service and the trainer as one process tree
    ab     compare and the `ab` commands
"""
