#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
#
# replica-secondary.sh with a raw secondary disk: a sparse plain file under
# hidden (a differencing VHD made by vhd-util snapshot -m, blktap's raw
# parent: a nil parent UUID), which the daemon serves with the aio driver.
# The same flow and checks; after the failover the raw file itself must
# equal the SVM's view byte for byte.
SECONDARY_RAW=1 exec bash "$(dirname "$0")/replica-secondary.sh"
