"""What the tests share, each module named for what it gives.

- `stack`: paths, the dev server's settings, and `Sortie`, a worker on a fresh queue
- `waiting`: `eventually`, waiting on a condition with a deadline (never a bare sleep)
- `processes`: `WorkerProcess`, a real `worker.py` to start, stop and kill
- `fleet`: in-memory machine activities, for fast tests of the workflows' logic
- `batches`: small batch files, settings and checks the end-to-end tests share
- `history`: reading what a workflow's exported history holds, and its largest payload
"""
