"""The link between the server and its engine process (and the engine and its tensor-parallel
workers): typed messages (messages.py) sent as frames on a socket."""
