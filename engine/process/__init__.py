"""The engine process: the Unix-socket server, the jobs it runs, and the client that starts and
talks to it.

Imports: server and jobs may import core, models, train and infer (the job bodies import the
heavy wings lazily, so the engine answers before torch loads). client.py imports only core: the
TUI imports it.
"""
