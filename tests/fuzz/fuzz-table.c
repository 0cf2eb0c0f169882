/* SPDX-License-Identifier: BSD-3-Clause */
/* The driver table of a fuzz harness (fuzz-table.h): one driver. */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "fuzz-table.h"

const struct td_driver *fuzz_driver;

const struct td_driver *td_driver_find(const char *name)
{
	return fuzz_driver && strcmp(name, fuzz_driver->name) == 0 ? fuzz_driver : NULL;
}

int td_driver_register(const struct td_driver *drv)
{
	(void)drv;
	return -ENOSPC;
}

const char *td_driver_names(void)
{
	return fuzz_driver ? fuzz_driver->name : "";
}
