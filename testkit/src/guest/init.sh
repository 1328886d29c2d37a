#!/bin/busybox sh
# /init of the test guest's initramfs (testkit/src/guest.rs, docs/test-guest.md). PID 1: loads
# the kernel modules the guest needs, mounts the data partition read-write at /data, prints the
# boot line on the serial console and then serves the command channel on it forever.
/bin/busybox mkdir -p /bin /proc /sys /dev /data /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/ttyS0 >/dev/ttyS0 2>&1

fail() {
	echo "BACKFLOW-BOOT-FAIL: $*"
}

# Dependencies first: the order is resolved from the kernel's modules.dep when the disk is made.
for m in $(cat /lib/modules/order); do
	insmod "/lib/modules/$m" || fail "insmod $m"
done

# The data partition, found by its label (the disk may not be vda in every domain).
data=
i=0
while [ $i -lt 100 ]; do
	data=$(findfs LABEL=@DATA_LABEL@ 2>/dev/null) && break
	sleep 0.1
	i=$((i + 1))
done
disk=
if [ -z "$data" ]; then
	fail "no partition labelled @DATA_LABEL@"
else
	# /dev/vda2 -> /dev/vda (a name ending in a digit and p, such as nvme0n1p2, is not expected).
	disk=$(echo "$data" | sed 's/[0-9]*$//')
	mount -t ext4 -o rw "$data" /data || fail "mount $data"
fi

# The ACPI power button (virsh shutdown) runs /etc/acpi/PWRF/00000080: a clean poweroff.
acpid -c /etc/acpi -l /tmp/acpid.log || fail "acpid"

echo 1 >/proc/sys/kernel/printk
stty raw -echo
echo "@BOOT_LINE@"
echo "BACKFLOW-GUEST disk=$disk data=$data kernel=$(uname -r)"

set -o pipefail
cd /data
while true; do
	while read -r id cmd a1 a2 a3; do
		[ -n "$id" ] || continue
		echo "BF-BEGIN $id"
		case "$cmd" in
		ping)
			echo pong
			;;
		read)
			base64 "$a1"
			;;
		write)
			printf '%s' "$a2" | base64 -d >"$a1" && sync
			;;
		fill)
			dd if=/dev/zero bs=1048576 count="$a2" 2>/dev/null |
				tr '\000' "\\$(printf %03o "$a3")" >"$a1" && sync &&
				sha256sum "$a1" | cut -d' ' -f1
			;;
		random)
			dd if=/dev/urandom of="$a1" bs=1048576 count="$a2" 2>/dev/null && sync &&
				sha256sum "$a1" | cut -d' ' -f1
			;;
		sha256)
			sha256sum "$a1" | cut -d' ' -f1
			;;
		disk-sha256)
			sync && echo 3 >/proc/sys/vm/drop_caches &&
				dd if="$disk" bs=65536 skip="$a1" count="$a2" iflag=skip_bytes,count_bytes 2>/dev/null |
				sha256sum | cut -d' ' -f1
			;;
		sh)
			printf '%s' "$a1" | base64 -d >/tmp/script 2>/tmp/out && sh /tmp/script >/tmp/out 2>&1
			s=$?
			base64 /tmp/out
			(exit $s)
			;;
		sync)
			sync
			;;
		poweroff)
			echo "BF-END $id 0"
			sync
			umount /data
			poweroff -f
			;;
		*)
			echo "unknown command $cmd"
			false
			;;
		esac
		echo "BF-END $id $?"
	done
done
