-- One Postgres server, one database per service. Each is created only when missing, so the
-- script works whatever POSTGRES_DB and POSTGRES_USER are (psql runs it with ON_ERROR_STOP).
SELECT 'CREATE DATABASE mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
SELECT 'CREATE DATABASE prefect' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'prefect')\gexec
SELECT 'CREATE DATABASE lora_ops' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'lora_ops')\gexec
