"""Stand-ins for the FileTransferService modules of the OpenTera repository (not in the PyPI
package) that the FTS tests import. FTS itself is assetd: its API is a proxy to assetd
(ot_harness.proxy) and its table a view of assetd (ot_harness.fts_records)."""
