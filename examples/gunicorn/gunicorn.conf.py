# gunicorn config for examples/gunicorn/app.py: the pool is created once in
# the master (preload_app) and shared by the workers.
#
#   cd examples/gunicorn && PYTHONPATH=../../client/python gunicorn -c gunicorn.conf.py app:app
#
# post_fork: each worker registers with the broker right away (attached pools).
# child_exit: the master frees at once the keys a dead worker still held
# (asks the broker to reclaim it; embedded pools free dead holders' leases).
from keymesh.gunicorn import child_exit, post_fork  # noqa: F401

bind = "127.0.0.1:8000"
workers = 4
preload_app = True
timeout = 60
