# Shoal A/B slot selection for U-Boot (hush): trial boots, try counting, fallback.
#
# Compile with: mkimage -A arm -T script -C none -d shoal-boot.cmd shoal-boot.scr
# and run it from bootcmd before loading the kernel, e.g.
#   bootcmd=load mmc 0:1 ${scriptaddr} shoal-boot.scr; source ${scriptaddr}; run boot_slot
#
# Output: the environment variable shoal_boot_slot = A or B, the slot to boot. The
# board maps it to a partition and root= and should add "shoal.slot=${shoal_boot_slot}"
# to bootargs (Shoal checks it against the environment before writing anything).
#
# Variables (see bootctl/DESIGN.md): shoal_slot (committed slot), shoal_try_slot
# (slot on trial), shoal_tries (trial boots left, 0..9), shoal_booted (slot booted
# last, written here). The environment must be redundant (CONFIG_ENV_REDUNDANT /
# two lines in fw_env.config): saveenv then writes the older copy and a power cut
# can never destroy both. Needs CONFIG_HUSH_PARSER and CONFIG_CMD_SAVEENV; no
# setexpr (the count-down is a chain, tries are at most 9).

# The committed slot; anything but B (including a missing variable) means A.
if test "${shoal_slot}" = "B"; then shoal_boot=B; else shoal_boot=A; fi
shoal_save=0

# A trial: count one try down and boot the trial slot while tries are left.
if test "${shoal_try_slot}" = "A" || test "${shoal_try_slot}" = "B"; then
    shoal_left=none
    if test "${shoal_tries}" = "9"; then shoal_left=8; fi
    if test "${shoal_tries}" = "8"; then shoal_left=7; fi
    if test "${shoal_tries}" = "7"; then shoal_left=6; fi
    if test "${shoal_tries}" = "6"; then shoal_left=5; fi
    if test "${shoal_tries}" = "5"; then shoal_left=4; fi
    if test "${shoal_tries}" = "4"; then shoal_left=3; fi
    if test "${shoal_tries}" = "3"; then shoal_left=2; fi
    if test "${shoal_tries}" = "2"; then shoal_left=1; fi
    if test "${shoal_tries}" = "1"; then shoal_left=0; fi
    if test "${shoal_left}" != "none"; then
        setenv shoal_tries ${shoal_left}
        shoal_boot=${shoal_try_slot}
        shoal_save=1
    fi
fi

# Record what is booted, so Shoal can tell a trial boot from a fallback.
if test "${shoal_booted}" != "${shoal_boot}"; then
    setenv shoal_booted ${shoal_boot}
    shoal_save=1
fi

# One saveenv for the count-down and the record; shoal_boot and shoal_save are
# shell-local and never stored.
if test "${shoal_save}" = "1"; then saveenv; fi
setenv shoal_boot_slot ${shoal_boot}
echo "shoal: booting slot ${shoal_boot_slot}"
