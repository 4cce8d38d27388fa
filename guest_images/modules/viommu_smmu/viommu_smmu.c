// SPDX-License-Identifier: GPL-2.0
/*
 * viommu_smmu - hand the stock arm-smmu-v3 driver the SMMUv3 register block that
 * viommu-backend presents in BAR0 of a PCI function ("route 2").
 *
 * The guest device tree holds an "arm,smmu-v3" node (one per SMMU function, each naming
 * its function with "viommu,pci-function") with status = "disabled", so nothing
 * probes it at boot while the function's memory decoding is still off.  This driver binds
 * the PCI function, enables it (memory decoding, bus mastering) and applies an OF changeset
 * that points the node's "reg" at BAR0 and sets its status to "okay": the platform device
 * is created inside the apply and the stock driver probes registers that already decode.
 * Needs CONFIG_OF_DYNAMIC (the kernels the project builds have it; Debian's do not).
 */
#include <linux/module.h>
#include <linux/of.h>
#include <linux/pci.h>
#include <linux/slab.h>

#define VIOMMU_VENDOR_ID	0x5555
#define VIOMMU_SMMU_DEVICE_ID	0x0806

struct viommu_smmu {
	struct of_changeset cs;
	struct device_node *np;
	bool applied;
};

/* A property for of_changeset_update_property(); the tree keeps it after the apply. */
static struct property *viommu_prop(const char *name, const void *value, int length)
{
	struct property *p = kzalloc(sizeof(*p), GFP_KERNEL);

	if (!p)
		return NULL;
	p->name = kstrdup(name, GFP_KERNEL);
	p->value = kmemdup(value, length, GFP_KERNEL);
	p->length = length;
	if (!p->name || !p->value) {
		kfree(p->name);
		kfree(p->value);
		kfree(p);
		return NULL;
	}
	return p;
}

/*
 * A node may name the PCI function whose BAR0 it describes with
 * "viommu,pci-function" = <domain bus devfn> (several SMMUs: each root complex's
 * iommu-map points at its own node); a node without it fits any function.
 */
static bool viommu_node_fits(struct device_node *np, struct pci_dev *pdev)
{
	u32 loc[3];

	if (of_property_read_u32_array(np, "viommu,pci-function", loc, ARRAY_SIZE(loc)))
		return true;
	return loc[0] == pci_domain_nr(pdev->bus) && loc[1] == pdev->bus->number &&
	       loc[2] == pdev->devfn;
}

static struct device_node *viommu_find_node(struct pci_dev *pdev)
{
	struct device_node *np;

	for_each_compatible_node(np, NULL, "arm,smmu-v3")
		if (!of_device_is_available(np) && viommu_node_fits(np, pdev))
			return np;	/* the loop's reference is ours now */
	return NULL;
}

static int viommu_smmu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	resource_size_t start = pci_resource_start(pdev, 0);
	resource_size_t len = pci_resource_len(pdev, 0);
	struct property *reg_prop, *status_prop;
	struct viommu_smmu *vs;
	__be32 reg[4];
	int ret;

	ret = pcim_enable_device(pdev);
	if (ret)
		return dev_err_probe(&pdev->dev, ret, "cannot enable the SMMU function\n");
	pci_set_master(pdev);

	vs = devm_kzalloc(&pdev->dev, sizeof(*vs), GFP_KERNEL);
	if (!vs)
		return -ENOMEM;
	vs->np = viommu_find_node(pdev);
	if (!vs->np)
		return dev_err_probe(&pdev->dev, -ENODEV,
				     "no disabled arm,smmu-v3 node for this function in the device tree\n");

	reg[0] = cpu_to_be32(upper_32_bits(start));
	reg[1] = cpu_to_be32(lower_32_bits(start));
	reg[2] = cpu_to_be32(upper_32_bits(len));
	reg[3] = cpu_to_be32(lower_32_bits(len));
	reg_prop = viommu_prop("reg", reg, sizeof(reg));
	status_prop = viommu_prop("status", "okay", sizeof("okay"));
	if (!reg_prop || !status_prop) {
		ret = -ENOMEM;
		goto put_node;
	}

	of_changeset_init(&vs->cs);
	ret = of_changeset_update_property(&vs->cs, vs->np, reg_prop);
	if (!ret)
		ret = of_changeset_update_property(&vs->cs, vs->np, status_prop);
	if (!ret)
		ret = of_changeset_apply(&vs->cs);
	if (ret) {
		of_changeset_destroy(&vs->cs);
		dev_err(&pdev->dev, "OF changeset for %pOF failed: %d\n", vs->np, ret);
		goto put_node;
	}
	vs->applied = true;
	pci_set_drvdata(pdev, vs);
	dev_info(&pdev->dev, "%pOF at BAR0 %pa (+%pa) handed to arm-smmu-v3\n", vs->np, &start, &len);
	return 0;

put_node:
	of_node_put(vs->np);
	return ret;
}

static void viommu_smmu_remove(struct pci_dev *pdev)
{
	struct viommu_smmu *vs = pci_get_drvdata(pdev);

	if (vs && vs->applied) {
		of_changeset_revert(&vs->cs);
		of_changeset_destroy(&vs->cs);
	}
	if (vs)
		of_node_put(vs->np);
}

static const struct pci_device_id viommu_smmu_ids[] = {
	{ PCI_DEVICE(VIOMMU_VENDOR_ID, VIOMMU_SMMU_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, viommu_smmu_ids);

static struct pci_driver viommu_smmu_driver = {
	.name = "viommu_smmu",
	.id_table = viommu_smmu_ids,
	.probe = viommu_smmu_probe,
	.remove = viommu_smmu_remove,
};
module_pci_driver(viommu_smmu_driver);

MODULE_DESCRIPTION("viommu-backend: SMMUv3 registers in a PCI BAR for the arm-smmu-v3 driver");
MODULE_LICENSE("GPL");
