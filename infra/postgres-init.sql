-- One Postgres server, one database per service.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
CREATE DATABASE lora_ops;
