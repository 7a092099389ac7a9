"""The store family: one contract (``base.Store``), the records it keeps, and its backends.

Import records, key statuses, ``clone``, the errors and ``Store`` from here (the SSA record and its
statuses are the model's: ``ssa.py``).  The backends are modules
of their own, imported only where a store is opened (``backends.open_store``): the embedded
TinyDB store over a durable journal (``tiny``, ``journal``) and PostgreSQL (``postgres``,
``pgschema``, which needs psycopg); ``transfer`` moves records between them, ``search`` is the
admin search's filter language.
"""

from .base import Store
from .errors import StoreDegraded, StoreLocked, StoreSchemaError, StoreUnavailable, UnstorableValue
from .records import (ENCRYPTED_FIELD, ID_FIELDS, KEY_ACTIVE, KEY_NEXT, KEY_RETIRED, KEY_RETIRING, KEY_STATES,
                      PRIVATE_JWK_MEMBERS, TABLES, AssertionRecord, AuditCheckpointRecord, AuditRecord,
                      ClientRecord, DeliveryRecord, KeyRecord, ScriptRevisionRecord, StatusListRecord,
                      TemplateRecord, WebhookRecord, can_sign, public_jwk)

__all__ = [
    "ENCRYPTED_FIELD", "PRIVATE_JWK_MEMBERS", "can_sign", "public_jwk",
    "ID_FIELDS", "KEY_ACTIVE", "KEY_NEXT", "KEY_RETIRED", "KEY_RETIRING", "KEY_STATES",
    "TABLES", "AssertionRecord", "AuditCheckpointRecord", "AuditRecord", "ClientRecord", "KeyRecord",
    "ScriptRevisionRecord", "Store",
    "StoreDegraded",
    "StoreLocked", "StoreSchemaError", "StoreUnavailable", "StatusListRecord", "TemplateRecord",
    "UnstorableValue", "DeliveryRecord", "WebhookRecord",
]
