"""`pipeinfer-cpu serve`: an OpenAI-compatible HTTP endpoint in front of the cluster.

The server is a user-facing process outside the MPI job, as `chat` is: it owns the requests and
their conversations and drives the job as its engine (app/client.py), one request at a time.

  api.py      OpenAI's bodies into engine requests, engine events into OpenAI's responses (pure)
  worker.py   the engine worker: the one owner of the client; a queue of jobs, answered in order
  routes.py   the HTTP side (Starlette): routes, API key, body limits, errors, streaming
  metrics.py  GET /metrics (Prometheus)
  service.py  start the cluster and the HTTP server, stop both on a signal or when a rank dies
"""
