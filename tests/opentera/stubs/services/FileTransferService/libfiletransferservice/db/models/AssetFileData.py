"""FTS's AssetFileData model (table t_asset_file_data: one row per stored file), for the two
ways the tests use it:

    AssetFileData.get_asset_for_uuid(uuid).delete_file_asset(folder)
    AssetFileData.query.filter(AssetFileData.asset_uuid.in_(uuids)).all()

The rows are assetd's, read through its API; ot_harness.fts_records says exactly where each
row comes from and why.
"""
from ot_harness import fts_records


class _Column:
    """`AssetFileData.asset_uuid` in a query expression."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, instance, owner):
        if instance is None:
            return self
        return instance.__dict__.get(self.name)

    def __set__(self, instance, value):
        instance.__dict__[self.name] = value

    def in_(self, values) -> list:
        return list(values)

    def __eq__(self, value) -> list:  # noqa: D105 (a filter expression, as in SQLAlchemy)
        return [value]

    __hash__ = object.__hash__


class _Query:
    """The rows for a list of uuids. assetd cannot list every file, so a query must name uuids."""

    def __init__(self, uuids: list | None = None):
        self.uuids = uuids

    def filter(self, uuids: list) -> '_Query':
        return _Query(uuids if self.uuids is None else [u for u in self.uuids if u in uuids])

    def filter_by(self, asset_uuid: str) -> '_Query':
        return self.filter([asset_uuid])

    def all(self) -> list:
        if self.uuids is None:
            raise NotImplementedError('AssetFileData rows are read from assetd one uuid at a time: filter on '
                                      'asset_uuid first')
        rows = (fts_records.row(asset_uuid) for asset_uuid in dict.fromkeys(self.uuids))
        return [AssetFileData(**row) for row in rows if row is not None]

    def first(self):
        rows = self.all()
        return rows[0] if rows else None


class _QueryProperty:
    def __get__(self, instance, owner) -> _Query:
        return _Query()


class AssetFileData:
    id_asset_file_data = _Column('id_asset_file_data')
    asset_uuid = _Column('asset_uuid')
    asset_original_filename = _Column('asset_original_filename')
    asset_file_size = _Column('asset_file_size')
    query = _QueryProperty()

    def __init__(self, **columns):
        for name in fts_records.ROW_FIELDS:
            setattr(self, name, columns.get(name))

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in fts_records.ROW_FIELDS}

    @staticmethod
    def get_asset_for_uuid(uuid_asset: str):
        return AssetFileData.query.filter_by(asset_uuid=uuid_asset).first()

    @staticmethod
    def get_assets_for_uuids(uuids_asset: list) -> list:
        return AssetFileData.query.filter(AssetFileData.asset_uuid.in_(uuids_asset)).all()

    def delete_file_asset(self, file_folder: str) -> bool:
        """FTS removes the file from `file_folder` and the row; with assetd, see fts_records.drop."""
        return fts_records.drop(self.asset_uuid)
