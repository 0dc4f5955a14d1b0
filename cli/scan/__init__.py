"""``medaudit scan``: every image of an archive through one served version's audit engine.

The pieces, one job each:

* :mod:`.sources`: what a SOURCE names (a folder tree, a dataset adapter spec, a list file) as
  an ordered list of items, fixed at the scan's start;
* :mod:`.worker`: one shard of items decoded and screened (or audited) by
  :class:`~medaudit.service.audit.AuditEngine`, each result decided by the service's flag policy,
  as rows; the same function wherever it runs;
* :mod:`.output`: the scan folder: manifest, item list, Parquet shards written atomically;
* :mod:`.runners`: where shards run: in this process, a local process pool, or Ray actors;
* :mod:`.run`: plan, resume, dispatch, progress;
* :mod:`.report`: the HTML summary of a finished scan.
"""
