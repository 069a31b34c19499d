"""The fine-tuning API's rows: customers' hashed keys, uploaded files and jobs.

Lists page as OpenAI's do: newest first, ``after`` naming the last id the caller saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from lora_ops.db.database import Database, RecordExists
from lora_ops.db.models import ApiKey, FineTuningJob, UploadedFile, utcnow

Row = TypeVar("Row", UploadedFile, FineTuningJob)


class FineTuningRecords:
    """Keys, files and jobs in the service database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # keys
    def add_key(self, sha256: str, customer: str, label: str = "") -> ApiKey:
        row = ApiKey(sha256=sha256, customer=customer, label=label, created_at=utcnow())
        try:
            with self.db.session() as session:
                session.add(row)
        except IntegrityError:
            raise RecordExists("this key is already stored") from None
        return row

    def key_customer(self, sha256: str) -> str | None:
        """The customer of a key that is not revoked; None for any other key."""
        with self.db.session() as session:
            row = session.get(ApiKey, sha256)
            return row.customer if row is not None and row.revoked_at is None else None

    def keys(self, customer: str | None = None) -> list[ApiKey]:
        query = select(ApiKey).order_by(ApiKey.created_at)
        if customer is not None:
            query = query.where(ApiKey.customer == customer)
        with self.db.session() as session:
            return list(session.scalars(query))

    def revoke_key(self, sha256_prefix: str) -> list[str]:
        """Revoke the keys whose sha256 starts with the prefix; their full sha256s."""
        with self.db.session() as session:
            query = select(ApiKey).where(ApiKey.sha256.startswith(sha256_prefix))
            rows = [row for row in session.scalars(query) if row.revoked_at is None]
            for row in rows:
                row.revoked_at = utcnow()
            return [row.sha256 for row in rows]

    # files
    def add_file(self, row: UploadedFile) -> UploadedFile:
        row.created_at = utcnow()
        with self.db.session() as session:
            session.add(row)
        return row

    def file(self, file_id: str) -> UploadedFile | None:
        with self.db.session() as session:
            return session.scalars(select(UploadedFile).where(UploadedFile.id == file_id)).first()

    def files(
        self,
        customer: str | None,
        after: str | None = None,
        limit: int = 10_000,
        purpose: str | None = None,
        newest_first: bool = True,
    ) -> list[UploadedFile]:
        filters = {"purpose": purpose} if purpose else {}
        return self._page(UploadedFile, customer, after, limit, filters, newest_first)

    def remove_file(self, file_id: str) -> bool:
        with self.db.session() as session:
            row = session.scalars(select(UploadedFile).where(UploadedFile.id == file_id)).first()
            if row is not None:
                session.delete(row)
        return row is not None

    # jobs
    def add_job(self, row: FineTuningJob) -> FineTuningJob:
        row.created_at = row.created_at or utcnow()
        with self.db.session() as session:
            session.add(row)
        return row

    def job(self, job_id: str) -> FineTuningJob | None:
        with self.db.session() as session:
            query = select(FineTuningJob).where(FineTuningJob.id == job_id)
            return session.scalars(query).first()

    def jobs(
        self, customer: str | None, after: str | None = None, limit: int = 10_000
    ) -> list[FineTuningJob]:
        return self._page(FineTuningJob, customer, after, limit, {}, True)

    def jobs_with_status(self, statuses: set[str]) -> list[FineTuningJob]:
        query = select(FineTuningJob).where(FineTuningJob.status.in_(sorted(statuses)))
        with self.db.session() as session:
            return list(session.scalars(query.order_by(FineTuningJob.seq)))

    def jobs_using_file(self, file_id: str) -> list[FineTuningJob]:
        query = select(FineTuningJob).where(
            (FineTuningJob.training_file == file_id) | (FineTuningJob.validation_file == file_id)
        )
        with self.db.session() as session:
            return list(session.scalars(query))

    def update_job(self, job_id: str, values: Mapping[str, Any]) -> FineTuningJob:
        """Set columns of one job; it must exist."""
        unknown = set(values) - set(FineTuningJob.__table__.columns.keys())
        if unknown:
            raise ValueError(f"fine_tuning_jobs has no column(s) {sorted(unknown)}")
        with self.db.session() as session:
            row = session.scalars(select(FineTuningJob).where(FineTuningJob.id == job_id)).one()
            for name, value in values.items():
                setattr(row, name, value)
        return row

    def _page(
        self,
        table: type[Row],
        customer: str | None,
        after: str | None,
        limit: int,
        filters: Mapping[str, Any],
        newest_first: bool,
    ) -> list[Row]:
        query = select(table)
        if customer is not None:
            query = query.where(table.customer == customer)
        for column, value in filters.items():
            query = query.where(getattr(table, column) == value)
        with self.db.session() as session:
            if after is not None:
                cursor = session.scalars(select(table.seq).where(table.id == after)).first()
                if cursor is None:
                    return []
                query = query.where(table.seq < cursor if newest_first else table.seq > cursor)
            order = table.seq.desc() if newest_first else table.seq.asc()
            return list(session.scalars(query.order_by(order).limit(limit)))
