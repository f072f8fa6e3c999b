"""The evidence studies of ``python -m examples.study`` (docs/results.md).

Each module has ``SETTINGS`` (``"full"`` and ``"smoke"`` :class:`Settings`),
``runs(settings, dataset) -> [Run]`` and ``report(settings, results, out) -> str``
(markdown; PNGs written into ``out``).
"""
