-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d): one database per
-- server, both owned by $POSTGRES_USER.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
