"""Case-study reports: a document model rendered to self-contained HTML and to Markdown."""
from circuitkit.report.document import Figure, Report, Section, Table

__all__ = ["Figure", "Report", "Section", "Table"]
