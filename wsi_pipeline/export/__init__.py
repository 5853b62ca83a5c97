"""Export an output folder into the layouts other tools read (``wsi-pipeline export --to clam|trident``).

:data:`EXPORTERS` maps a format name to its exporter; :func:`export_outputs` runs one over
every slide. See :mod:`.clam` and :mod:`.trident` for what each client gets.
"""

from .stage import EXPORTERS, ExportResult, ExportSummary, export_outputs, exporter_names, get_exporter

__all__ = ["EXPORTERS", "ExportResult", "ExportSummary", "export_outputs", "exporter_names", "get_exporter"]
