"""The manifest's data model now lives in ``shardstore.store.manifest`` (and its JSON in ``store.manifest_json``).

Kept so that ``from shardstore.manifest.model import ...`` keeps working.
"""

from shardstore.store.manifest import (  # noqa: F401
    CHECKSUM_ALGORITHM,
    FORMAT_NAME,
    FORMAT_VERSION,
    FieldSpec,
    FileEntry,
    Manifest,
    Problem,
    ShardEntry,
)
from shardstore.store.manifest_json import CHECKSUM  # noqa: F401
from shardstore.store.snapshot import manifest_path  # noqa: F401
