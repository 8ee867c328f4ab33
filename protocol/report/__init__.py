"""Reports a policymaker can read: one self-contained HTML page (docs/architecture.md, Reports).

Pure: facts in (a job's summary, or the two oversight exports and the oversight check), one
HTML string out. ``facts`` gathers them (``job_facts``, ``inspector_facts``), ``render``
writes the page (``render_report``), ``charts`` draws its inline SVG. The CLIs gather the
facts and write the file (``agency-a report``, ``psi-authority oversight --html``,
``make demo``).
"""

__all__ = [
    "charts",
    "facts",
    "render",
]
