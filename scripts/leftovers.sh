#!/usr/bin/env bash
# Prints, one line per item and sorted, what a test run could leave behind on
# the local backing services: Redis keys (per database, and on each primary
# of the local Redis Cluster that scripts/redis-cluster.sh runs), PostgreSQL and
# MariaDB tables outside the system schemas, RabbitMQ queues, JetStream
# streams kept on disk. .ci/run takes this inventory before and after the
# test suite and fails when the second has anything the first had not.
set -uo pipefail

{
  for db in $(redis-cli -h 127.0.0.1 -p 6379 info keyspace 2>/dev/null | tr -d '\r' |
      sed -n 's/^db\([0-9]*\):.*/\1/p'); do
    redis-cli -h 127.0.0.1 -p 6379 -n "$db" --scan 2>/dev/null | sed "s/^/redis db$db /"
  done
  base="${REDIS_CLUSTER_PORT:-7000}"
  for port in $(seq "$base" $((base + 5))); do
    if timeout 2 redis-cli -h 127.0.0.1 -p "$port" role 2>/dev/null | head -n 1 | grep -q '^master'; then
      timeout 10 redis-cli -h 127.0.0.1 -p "$port" --scan 2>/dev/null | sed "s/^/redis cluster /"
    fi
  done
  psql -h 127.0.0.1 -U postgres -d test -Atqc \
    "SELECT 'postgres ' || schemaname || '.' || tablename FROM pg_tables
     WHERE schemaname NOT IN ('pg_catalog', 'information_schema')" 2>/dev/null
  mariadb -h 127.0.0.1 -u root -N -e \
    "SELECT CONCAT('mariadb ', table_schema, '.', table_name) FROM information_schema.tables
     WHERE table_schema NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys')" 2>/dev/null
  timeout 30 rabbitmqctl list_queues -q name 2>/dev/null | sed -n 's/^\(.\+\)$/rabbitmq queue \1/p' | grep -v '^rabbitmq queue name$'
  for dir in /var/lib/nats-server/jetstream/*/streams/*/; do
    [ -d "$dir" ] && echo "nats stream $(basename "$dir")"
  done
} | sort
exit 0
