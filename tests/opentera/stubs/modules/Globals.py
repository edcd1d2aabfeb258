"""TeraServer's modules/Globals.py: the wheel's TeraProject.get_users_in_project reads
`opentera_service_id` from here (TeraServer sets it at start to its own service's id; so does
modules.DatabaseModule.DBManager.create_defaults)."""
db_man = None
login_module = None
opentera_service_id = 1
opentera_doc_url = False
