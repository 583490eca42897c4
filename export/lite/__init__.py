"""`python -m export.lite` (see export/lite/__main__.py): the TorchScript Lite formats through the one export
pipeline, then the Flutter asset bundle. The format code itself lives in export.torchscript."""
