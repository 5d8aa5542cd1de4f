"""Human feedback in the browser: ``rlhfkit annotate serve`` and friends.

* :mod:`~rlhfkit.feedback.web.store` - the SQLite database (pairs, annotators,
  leases, labels); the single source of truth, every label committed before it
  is acknowledged;
* :mod:`~rlhfkit.feedback.web.app` - the FastAPI app and the annotator page
  (``static/``: plain HTML, CSS and JavaScript, no build step, no CDN);
* :mod:`~rlhfkit.feedback.web.admin` - loading pairs, status and agreement,
  majority-vote export to the usual preference formats, and the pipeline's
  ``label`` stage with ``source: human-web``;
* :mod:`~rlhfkit.feedback.web.cli` - ``rlhfkit annotate serve | add-annotator | status | export | terminal``.

Exported labels are :class:`~rlhfkit.data.records.Comparison` records like
those of every other feedback source. Votes are graded on InstructGPT's / HH's
7-point scale (A much better ... tie ... B much better) with a "both bad" flag;
:mod:`rlhfkit.feedback.grades` maps each grade to the Bradley-Terry margin and
soft label the export writes to ``meta``.
"""
