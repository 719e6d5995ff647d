from services.etcd_migration.app import SPEC
from shared.service import main

main(SPEC)
