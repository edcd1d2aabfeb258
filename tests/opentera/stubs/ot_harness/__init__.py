"""Shared pieces of the harness that runs OpenTera's FileTransferService tests against assetd.

See tests/opentera/README.md. Nothing here is OpenTera's code: the `services` and `modules`
packages next to this one stand in for the OpenTera repository modules the tests import, and
`teraserver_double` plays TeraServer.
"""
