/* tests/slurm/pyxis_stub.c -- SPANK plugin for the TEST cluster only (tests/slurm/cluster_up.sh
 * with EAOPD_SLURM_PYXIS=1). It accepts the pyxis options slurm/launch.sh passes to srun when
 * CONTAINER is set, so the container code path runs on a cluster without pyxis/enroot. Tasks
 * still run on the host; the values are exported to them as EAOPD_STUB_CONTAINER_IMAGE /
 * EAOPD_STUB_CONTAINER_MOUNTS so a test can check what srun was given.
 * Options must be registered from slurm_spank_init() (a static spank_options table is ignored
 * by sbatch/salloc). Build: gcc -shared -fPIC -o pyxis_stub.so pyxis_stub.c (libslurm-dev). */
#include <stdio.h>
#include <slurm/spank.h>

SPANK_PLUGIN(eaopd_pyxis_stub, 1);

static char image[1024], mounts[4096];

static int set_image(int v, const char *arg, int remote)
{
	(void)v; (void)remote;
	if (arg) snprintf(image, sizeof(image), "%s", arg);
	return 0;
}

static int set_mounts(int v, const char *arg, int remote)
{
	(void)v; (void)remote;
	if (arg) snprintf(mounts, sizeof(mounts), "%s", arg);
	return 0;
}

static int ignore(int v, const char *arg, int remote)
{
	(void)v; (void)arg; (void)remote;
	return 0;
}

static struct spank_option opts[] = {
	{"container-image", "IMAGE", "[test stub] pyxis image (job runs on the host)", 1, 0, set_image},
	{"container-mounts", "SRC:DST[,...]", "[test stub] pyxis mounts", 1, 0, set_mounts},
	{"container-workdir", "PATH", "[test stub] ignored", 1, 0, ignore},
	{"container-name", "NAME", "[test stub] ignored", 1, 0, ignore},
	{"container-mount-home", NULL, "[test stub] ignored", 0, 0, ignore},
	{"no-container-mount-home", NULL, "[test stub] ignored", 0, 0, ignore},
};

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	(void)ac; (void)av;
	for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++)
		if (spank_option_register(sp, &opts[i]) != ESPANK_SUCCESS)
			slurm_error("eaopd_pyxis_stub: cannot register --%s", opts[i].name);
	return 0;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	(void)ac; (void)av;
	if (image[0]) spank_setenv(sp, "EAOPD_STUB_CONTAINER_IMAGE", image, 1);
	if (mounts[0]) spank_setenv(sp, "EAOPD_STUB_CONTAINER_MOUNTS", mounts, 1);
	return 0;
}
