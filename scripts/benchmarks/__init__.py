"""The "Speed" benchmark: dicomfs side by side with the wire, local disk, rclone and friends.

Everything runs against a private Orthanc on loopback, on the sample archive the tests use
(a 400-slice 512x512 CT, ~200 MB), eight generated 25 MB series for the parallel test and a
2000-slice (~1 GB) study for the memory test. "Cold" means a fresh cache folder and a fresh
mount for every run; nothing global is dropped (no drop_caches), so Orthanc's own files are
in the page cache for every row alike. Every figure is the median of ``--runs`` runs.

The network section (network.py; ``--only network``, ``--skip-network``)
reads the CT series over emulated links, and measures latency there
(latency.py, also alone with ``--only latency``): first bytes by path,
``ls -R``, a big instance. Each section writes only what it measured into its own
generated block of the Markdown report (``--output``, default docs/performance.md),
keeping the hand-written explanations around it, and a plot next to it (.png, and
-network.png). Run it through ``scripts/bench``, which installs what it needs (it runs
``python -m scripts.benchmarks`` from the checkout's root).

The scale section (scale.py; ``--only scale``, never in the default run) walks /dates,
/patients and /studies on a generated archive of ``--scale-studies`` studies, counting the
requests (issue 18); it also runs alone as ``python -m scripts.benchmarks.scale``.

On their own: ``python -m scripts.benchmarks.listing`` (``ls`` on 10,000 studies),
``.metrics`` (what counting costs) and ``.multipart`` (the parser's throughput).
"""
