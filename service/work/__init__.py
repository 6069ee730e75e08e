"""The worker's side of a job, as modules named for what they do.

``service.jobs.run_job`` (the function the API enqueues by dotted path) takes a job from RQ,
claims the queued jobs of its batch group (``service.batching``) and hands them here:

- ``context``: what the code shares at three scopes: the worker process (``WorkerState``:
  settings, registry, model cache), a batch (``Run``: the model, task and loaded model its
  jobs share) and a job (``Work``: its id, its stored request validated with the API's own
  ``RunTaskRequest``, its RQ job).
- ``run``: batch orchestration and recording: the ``started`` events, loading the model,
  one engine call per batch, the result documents and terminal events, the metrics.
- ``inputs``: a request's inputs as the model's tensors (tokens, images, feature rows), and
  the jobs of a batch merged into one batch.
- ``classify``: one engine call for the rows of every job of a batch.
- ``generate``: generation, streaming its ``prompt``, ``token`` and ``relevance`` events.
- ``documents``: the result documents, receipts and events, as clients read them.

Status and event names come from ``service.vocabulary``, task names from ``engine.tasks``."""
