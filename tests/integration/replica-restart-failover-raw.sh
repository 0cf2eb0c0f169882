#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
#
# replica-restart-failover.sh with a raw secondary disk (hidden made by
# vhd-util snapshot -m over a sparse plain file): SIGKILL while
# replicating, restart, failover; the raw file must then equal the SVM's
# view byte for byte.
SECONDARY_RAW=1 exec bash "$(dirname "$0")/replica-restart-failover.sh"
