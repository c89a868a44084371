"""The synthetic world and its traffic. Imports analysis and the core.

    world    users, videos and a logging policy: history files and live requests
    traffic  `watchnext simulate traffic`: the world as a client of a running service
"""
