"""A test double of OpenTera's TeraServer, for running FTS's tests against assetd.

Built on OpenTera's own models (`opentera.db.models`, from the PyPI package) in the tests'
database, it answers the part of TeraServer's API that FileTransferService and its tests use,
with TeraServer's rules and answer shapes (read from OpenTera's `modules/FlaskModule/API/*`,
`modules/LoginModule/LoginModule.py` and `modules/DatabaseModule/*`; none of that code is
copied here). It also does what TeraServer does around FTS: publish the services' records and
the database events on Redis.

- auth.py:   how TeraServer authenticates services, users, participants and devices
- access.py: what each of them may see (TeraServer's DBManager*Access rules)
- api.py:    the endpoints, registered on the namespaces FakeFileTransferService creates
- events.py: database events and service records on Redis
- server.py: the same Flask app on a real port, for assetd
"""
