"""The care-sync mobile API, driven from Python through the generated UniFFI bindings.

Run by mobile-ffi/tests/python.rs, which builds the library, generates the bindings, starts a
real server on 127.0.0.1 and passes the tokens and NHS numbers in the environment.
"""

import asyncio
import faulthandler
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.environ["CARE_FFI_DIR"])
from care_sync import care_mobile_ffi as ffi  # noqa: E402
from care_sync import care_node as cn  # noqa: E402  (record types defined in care-node)

# A hang shows where every thread was (and ends the test) instead of waiting for ever.
faulthandler.dump_traceback_later(150, exit=True)

NHS = os.environ["CARE_NHS"]
OTHER = os.environ["CARE_NHS_OTHER"]


class Keystore(ffi.KeyProvider):
    """A stand-in for the Android Keystore / iOS Keychain: XOR with a device secret."""

    def __init__(self):
        self.secret = bytes(range(7, 39))
        self.calls = 0

    def wrap_key(self, key):
        self.calls += 1
        return bytes(a ^ b for a, b in zip(key, self.secret))

    def unwrap_key(self, wrapped):
        self.calls += 1
        if len(wrapped) != 32:
            raise ffi.KeystoreError.Failed(message="wrapped key has the wrong length")
        return bytes(a ^ b for a, b in zip(wrapped, self.secret))


class BrokenKeystore(Keystore):
    def unwrap_key(self, wrapped):
        raise ffi.KeystoreError.Failed(message="key permanently invalidated")


class CancelledKeystore(Keystore):
    def unwrap_key(self, wrapped):
        raise ffi.KeystoreError.Cancelled()


class Listener(ffi.SyncListener):
    def __init__(self):
        self.progress = []
        self.new_data = 0
        self.notifications = 0
        self.threads = set()

    def on_progress(self, applied, total):
        self.threads.add(threading.current_thread().name)
        self.progress.append((applied, total))

    def on_new_data(self, changed, notifications):
        self.threads.add(threading.current_thread().name)
        self.new_data += changed
        self.notifications += notifications


def step(what):
    """Marks progress on standard error: a failure or a hang shows the last step reached."""
    print(f"step: {what}", file=sys.stderr, flush=True)


def expect(error_class, fn, *args):
    try:
        fn(*args)
    except error_class as e:
        return e
    raise AssertionError(f"expected {error_class.__name__}")


async def expect_async(error_class, coro):
    try:
        await coro
    except error_class as e:
        return e
    raise AssertionError(f"expected {error_class.__name__}")


async def main():
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "device.db")
    keystore = Keystore()
    node = ffi.CareNode.open_with_keystore(path, keystore)
    assert keystore.calls == 1, "the data key was wrapped by the platform keystore"
    status = node.status()
    assert not status.enrolled and status.patients == 0

    step("Before enrolment: a clear error of the right kind.")
    # Before enrolment: a clear error of the right kind.
    await expect_async(ffi.CareError.NotEnrolled, node.sync(None))
    await expect_async(ffi.CareError.InvalidInput, node.enrol("not a token"))

    enrolled = await node.enrol(os.environ["CARE_TOKEN"])
    assert enrolled.device_name == "tablet-py" and enrolled.role == "ambulance-crew"
    await expect_async(ffi.CareError.AlreadyEnrolled, node.enrol(os.environ["CARE_TOKEN"]))

    step("The Rust side assigns the caseload once it sees the enrolmen")
    # The Rust side assigns the caseload once it sees the enrolment.
    ready = os.environ["CARE_READY_FILE"]
    for _ in range(200):
        if os.path.exists(ready):
            break
        time.sleep(0.05)

    listener = Listener()
    outcome = await node.sync(listener)
    assert outcome.stats.documents_received == 3, outcome.stats
    assert listener.progress and listener.progress[-1] == (3, 3), listener.progress
    assert all(applied > 0 and total == 3 for applied, total in listener.progress), listener.progress
    assert threading.main_thread().name not in listener.threads, listener.threads
    assert listener.new_data >= 3
    assert len(node.list_patients()) == 3
    assert node.notifications(10) == [] and listener.notifications == 0, "nothing happened to them yet"

    view = node.read_patient(NHS, False)
    assert view.demographics.nhs_number == NHS
    assert view.last_sync_ms is not None and view.as_of_ms > 0
    assert view.allergies_status in (ffi.SectionStatus.ENTRIES, ffi.SectionStatus.NONE_KNOWN, ffi.SectionStatus.NO_INFORMATION)
    first_name = view.demographics.name.split()[0]
    hits = node.search(ffi.SearchQuery(name=first_name.lower()))
    assert any(h.nhs_number == NHS for h in hits), hits
    assert [h.nhs_number for h in node.search(ffi.SearchQuery(nhs_number=NHS))] == [NHS]
    node.read_patient(NHS, True)

    step("Record an attendance with observations (no connection used); NEWS2 comes")
    # Recorded on the device alone, as offline; NEWS2 comes back at once.
    obs = cn.Observations(
        respiration_rate=24,
        spo2=91,
        spo2_scale_2=False,
        on_oxygen=True,
        systolic_bp=98,
        pulse=118,
        consciousness=cn.Consciousness.CONFUSION,
        temperature_c=38.6,
        pregnant=False,
    )
    attendance = node.record_attendance(NHS, obs, "fall at home")
    assert attendance.assessment.is_scored(), attendance.assessment
    news2 = attendance.assessment.news2
    assert news2.total == 15 and news2.risk == cn.ClinicalRisk.HIGH
    mistaken = node.record_attendance(NHS, obs, "recorded against the wrong patient")
    node.mark_entered_in_error(NHS, cn.Section.ENCOUNTERS, mistaken.entry_id, "wrong patient")
    view = node.read_patient(NHS, False)
    ids = [e.id for e in view.encounters]
    assert attendance.entry_id in ids and mistaken.entry_id not in ids
    assert view.entered_in_error_hidden == 1
    assert node.status().pending_changes == 3

    outcome = await node.sync(listener)
    assert outcome.stats.uploaded_changes == 3, outcome.stats
    assert node.status().pending_changes == 0

    step("Entries of every section a crew may write, offline, with the")
    # Entries of every section a crew may write, offline, with the CLI's checks.
    added = {
        "allergies": node.add_entry(NHS, cn.NewEntry.ALLERGY("Latex", "urticaria", "moderate")),
        "problems": node.add_entry(NHS, cn.NewEntry.PROBLEM("Fractured neck of femur")),
        "medications": node.add_entry(NHS, cn.NewEntry.MEDICATION("Morphine", "2.5 mg", "intravenous", None)),
        "alerts": node.add_entry(NHS, cn.NewEntry.ALERT("communication", "Hard of hearing: face her when speaking")),
        "contacts": node.add_entry(NHS, cn.NewEntry.CONTACT("Ann Tester", "daughter", "07700 900123")),
        "results": node.add_entry(NHS, cn.NewEntry.RESULT("Capillary blood glucose", "6.1", "mmol/L")),
    }
    after = node.read_patient(NHS, False)
    for section, entry_id in added.items():
        assert entry_id in [e.id for e in getattr(after, section)], section
    assert any(e.entry.substance == "Latex" and e.entry.severity == "moderate" for e in after.allergies)
    step("A crew's role does not write care plans: refused on the devi")
    # A crew's role does not write care plans: refused on the device, before anything is stored.
    e = expect(ffi.CareError.NotPermitted, node.add_entry, NHS, cn.NewEntry.CARE_PLAN("Weekly review", None))
    assert "Weekly review" not in str(e)
    e = expect(ffi.CareError.InvalidInput, node.add_entry, NHS, cn.NewEntry.ALERT("gossip", "Secret text"))
    assert "alert kind" in str(e) and "Secret" not in str(e), str(e)
    expect(ffi.CareError.InvalidInput, node.add_entry, NHS, cn.NewEntry.PROBLEM("   "))
    pending = node.status().pending_changes
    assert pending == len(added), pending
    outcome = await node.sync(None)
    assert outcome.stats.uploaded_changes == pending and outcome.stats.refused_changes == 0, outcome.stats

    step("Error mapping: kinds are right and messages carry no patient")
    # Error mapping: kinds are right and messages carry no patient data.
    e = expect(ffi.CareError.InvalidInput, node.read_patient, "9990000010", False)
    assert "9990000010" not in str(e)
    expect(ffi.CareError.UnknownPatient, node.read_patient, OTHER, False)
    expect(ffi.CareError.InvalidInput, node.mark_entered_in_error, NHS, cn.Section.ALLERGIES, "not-a-uuid", "x")
    step("The write policy: an entry from the GP record (another autho")
    # The write policy: an entry from the GP record (another author) cannot be marked by a device.
    gp_entry = next(e for section in (view.allergies, view.medications, view.problems) for e in section)
    owner = next(k for k, v in ((cn.Section.ALLERGIES, view.allergies), (cn.Section.MEDICATIONS, view.medications), (cn.Section.PROBLEMS, view.problems)) if gp_entry in v)
    e = expect(ffi.CareError.NotPermitted, node.mark_entered_in_error, NHS, owner, gp_entry.id, "not this patient")
    assert "foreign-entry" in str(e), str(e)

    step("Break glass for a patient outside the caseload: granted, aud")
    # Break glass for a patient outside the caseload: granted, audited, the record arrives.
    result = await node.break_glass(OTHER, "unconscious in the street, no carers present")
    assert result.granted, result.message
    assert node.read_patient(OTHER, False).demographics.nhs_number == OTHER
    outcome = await node.sync(None)
    log = node.audit_log(50)
    actions = [entry.action for entry in log]
    assert "ffi-read" in actions and "search-open" in actions and "break-glass" in actions, actions
    assert all(entry.uploaded for entry in log), "every view reached the server"

    step("A second device, a community nurse's, with hundreds of patie")
    # A second device, a community nurse's, with hundreds of patients: reads while it syncs.
    nurse_path = os.path.join(tmp, "nurse.db")
    nurse = ffi.CareNode.open_with_passphrase(nurse_path, "nurse passphrase")
    await nurse.enrol(os.environ["CARE_TOKEN_2"])
    caseload = int(os.environ["CARE_NURSE_CASELOAD"])
    nurse_listener = Listener()
    sync = asyncio.ensure_future(nurse.sync(nurse_listener))
    reads = []  # (seconds, patients seen) of each read made once documents were arriving
    while not sync.done():
        if nurse_listener.progress:
            started = time.monotonic()
            seen = len(nurse.list_patients())
            reads.append((time.monotonic() - started, seen))
        await asyncio.sleep(0.002)
    outcome = await sync
    assert outcome.stats.documents_received == caseload, outcome.stats
    step("Reads saw the sync part-way (its pages committed one by one)")
    # Reads saw the sync part-way (its pages committed one by one) and never waited for it.
    assert any(0 < seen < caseload for _, seen in reads), reads
    assert max(took for took, _ in reads) < 1.0, reads
    partial = sum(1 for _, seen in reads if 0 < seen < caseload)
    print(f"reads during a {caseload}-patient sync: {len(reads)}, {partial} saw it part-way, "
          f"slowest {max(took for took, _ in reads) * 1000:.0f} ms; sync {outcome.duration_ms} ms, "
          f"{len(nurse_listener.progress)} progress calls")
    steps = [b[0] - a[0] for a, b in zip(nurse_listener.progress, nurse_listener.progress[1:])]
    assert len(nurse_listener.progress) >= 50 and max(steps) <= caseload // 50, nurse_listener.progress
    assert nurse_listener.progress[-1] == (caseload, caseload)

    step("Live: the crew's tablet watches; the nurse records a problem")
    # Live: the crew's tablet watches; the nurse records a problem for a patient both hold and
    # syncs; the watching tablet hears of it, reads it while still watching, and its other
    # network calls are Busy until the watch stops.
    live = Listener()
    watch = await node.watch(live)
    await asyncio.sleep(1.0)  # connected and caught up
    before = live.new_data
    nurse.add_entry(NHS, cn.NewEntry.PROBLEM("Pressure ulcer, sacrum"))
    await nurse.sync(None)
    for _ in range(100):
        if live.new_data > before:
            break
        await asyncio.sleep(0.1)
    assert live.new_data > before, "the watch heard of the nurse's entry"
    problems = [e.entry.description for e in node.read_patient(NHS, False).problems]
    assert "Pressure ulcer, sacrum" in problems, problems
    await expect_async(ffi.CareError.Busy, node.sync(None))
    await expect_async(ffi.CareError.Busy, node.watch(live))
    expect(ffi.CareError.Busy, node.wipe)
    watch.stop()
    watched = await watch.wait()
    assert watched.stats.changes_received >= 1, watched.stats
    await expect_async(ffi.CareError.InvalidInput, watch.wait())
    await node.sync(None)  # the connection is free again

    step("Opening a store the wrong way, or a keystore that fails: eac")
    # Opening a store the wrong way, or a keystore that fails: each its own kind, one message.
    del node
    e = expect(ffi.CareError.KeystoreFailed, ffi.CareNode.open_with_keystore, path, BrokenKeystore())
    assert str(e).count("key permanently invalidated") == 1 and str(e).count("keystore") == 1, str(e)
    e = expect(ffi.CareError.KeystoreCancelled, ffi.CareNode.open_with_keystore, path, CancelledKeystore())
    assert "cancelled" in str(e), str(e)
    e = expect(ffi.CareError.WrongUnlockMethod, ffi.CareNode.open_with_passphrase, path, "a passphrase")
    assert str(e) == "this store is unlocked with the platform keystore, not with a passphrase", str(e)
    e = expect(ffi.CareError.WrongUnlockMethod, ffi.CareNode.open_with_keystore, nurse_path, Keystore())
    assert "unlocked with a passphrase" in str(e), str(e)

    step("The passphrase variant: a wrong passphrase is WrongKey.")
    # The passphrase variant: a wrong passphrase is WrongKey.
    other_path = os.path.join(tmp, "passphrase.db")
    ffi.CareNode.open_with_passphrase(other_path, "right")
    expect(ffi.CareError.WrongKey, ffi.CareNode.open_with_passphrase, other_path, "wrong")

    step("Wipe: the data key is destroyed and the store refuses to ope")
    # Wipe: the data key is destroyed and the store refuses to open.
    node = ffi.CareNode.open_with_keystore(path, Keystore())
    node.wipe()
    expect(ffi.CareError.Wiped, node.list_patients)
    await expect_async(ffi.CareError.Wiped, node.sync(None))
    expect(ffi.CareError.Wiped, ffi.CareNode.open_with_keystore, path, Keystore())


asyncio.run(main())
print("python ffi test: all checks passed")
