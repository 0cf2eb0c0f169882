#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# test-primary again, every test on the libnbd client (client=libnbd)
# instead of the native one: both clients must pass the same suite.
set -eu
exec env TDR_TEST_CLIENT=libnbd "$TDR_BUILDDIR/tests/unit/test-primary" "$@"
