"""Stand-ins for TeraServer's `modules` package of the OpenTera repository (not in the PyPI
package), with only what FakeFileTransferService, the FTS tests and the wheel's models use.
The TeraServer behaviour itself is in `teraserver_double`."""
