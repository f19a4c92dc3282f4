"""The cross-region test framework (``bucketmesh xr``): proof, before and after a
rollout, that a multi-region deployment keeps one consistent bucket, stays fast,
and survives partitions and crashes.

| module | owns |
|---|---|
| ``load.py`` | the open-loop load generator and its recorder (HDR histograms, per-second series) |
| ``verify.py`` | reading one bucket from every region; agreement and catch-up checks |
| ``scrape.py`` | scraping ``/metrics`` and the bucket's state during a run; CSV export |
| ``scenario.py`` | the scenario file format and its SLO thresholds |
| ``runner.py`` | playing a scenario: local mesh or given URLs, phases, faults, convergence |
| ``slo.py`` | judging a run against its SLOs |
| ``report.py`` | the HTML report, PNG plots and CSVs |
| ``live.py`` | the live progress table |
| ``cli.py`` | ``bucketmesh xr load / verify / run`` |

Needs the ``xr`` extra (``pip install 'bucketmesh[xr]'``): httpx, hdrhistogram,
matplotlib, rich. Nothing here is imported by ``bucketmesh serve``.
"""

#: The bucket key for an X-API-Key value under the example rule
#: (``agent-api-key-{{ .Request.Header.X-API-Key | sha256 }}``): ``{sha256}`` is the
#: value's hash as ``| sha256`` writes it, ``{}`` the value itself.
DEFAULT_KEY_TEMPLATE = "agent-api-key-{sha256}"


def bucket_key(template: str, api_key: str) -> str:
    """The bucket key ``template`` names for ``api_key``."""
    from bucketmesh.core.rules import hashed_value

    return template.format(api_key, sha256=hashed_value(api_key))
