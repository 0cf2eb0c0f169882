/* SPDX-License-Identifier: BSD-3-Clause */
/* The driver table: built-in drivers plus any registered at run time. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "tdr/image.h"

extern const struct td_driver td_drv_aio;
extern const struct td_driver td_drv_vhd;
extern const struct td_driver td_drv_replica;

#define MAX_EXTRA_DRIVERS 8

static const struct td_driver *const builtin_drivers[] = {
	&td_drv_aio,
	&td_drv_vhd,
	&td_drv_replica,
};

static const struct td_driver *extra_drivers[MAX_EXTRA_DRIVERS];
static unsigned n_extra;

const struct td_driver *td_driver_find(const char *name)
{
	for (size_t i = 0; i < sizeof(builtin_drivers) / sizeof(builtin_drivers[0]); i++)
		if (strcmp(builtin_drivers[i]->name, name) == 0)
			return builtin_drivers[i];
	for (unsigned i = 0; i < n_extra; i++)
		if (strcmp(extra_drivers[i]->name, name) == 0)
			return extra_drivers[i];
	return NULL;
}

int td_driver_register(const struct td_driver *drv)
{
	if (td_driver_find(drv->name))
		return -EEXIST;
	if (n_extra == MAX_EXTRA_DRIVERS)
		return -ENOSPC;
	extra_drivers[n_extra++] = drv;
	return 0;
}

const char *td_driver_names(void)
{
	static char names[256];
	size_t len = 0;

	names[0] = '\0';
	for (size_t i = 0; i < sizeof(builtin_drivers) / sizeof(builtin_drivers[0]); i++)
		len += (size_t)snprintf(names + len, sizeof(names) - len, "%s%s",
					len ? ", " : "", builtin_drivers[i]->name);
	for (unsigned i = 0; i < n_extra && len < sizeof(names); i++)
		len += (size_t)snprintf(names + len, sizeof(names) - len, "%s%s",
					len ? ", " : "", extra_drivers[i]->name);
	return names;
}
