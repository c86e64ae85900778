"""The report: one run on one page, as `RUN/report.html` (self-contained) and `RUN/report.md`.

- page: the stage (`write_report`) and everything the page shows (`report_context`), by section;
- formatting: the templates' filters (numbers, intervals, money, durations; Markdown made inert);
- analysis: the kept instructions described (lengths, ROUGE-L novelty, verbs and objects);
- charts: the SVG charts (matplotlib, imported only when drawing).
"""

from .formatting import ci, duration, md_code, md_fence, md_inline, num, pct, usd
from .page import METRIC_DESCRIPTIONS, report_context, write_report

__all__ = [
    "METRIC_DESCRIPTIONS",
    "ci",
    "duration",
    "md_code",
    "md_fence",
    "md_inline",
    "num",
    "pct",
    "report_context",
    "usd",
    "write_report",
]
