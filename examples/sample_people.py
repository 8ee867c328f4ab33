"""The sample people every example uses: the custodian's file and the requester's subjects.

Data only, shared so the three programs show their flows, not the same records three times.
Every value is invented; TINs follow the SSN layout, addresses are ordinary street addresses.
"""

from __future__ import annotations

from protocol import PersonRecord, QueryMetadata, QueryRecord

#: agency-b's file. ``tax_paid_cents`` is an extra column: disclosable only when an
#: authorization names it, and the value the aggregate tier sums.
CUSTODIAN_RECORDS = [
    PersonRecord(record_id="b-1001", tin="123-45-6789", first_name="Ann", last_name="Lee",
                 dob="1980-04-12", address="12 Main Street", city="Springfield", state="IL",
                 zip="62701", extra=(("tax_paid_cents", "1250000"),)),
    PersonRecord(record_id="b-1002", tin="234-56-7890", first_name="Bob", last_name="Okafor",
                 dob="1975-11-03", address="48 Oak Avenue", city="Springfield", state="IL",
                 zip="62702", extra=(("tax_paid_cents", "830000"),)),
    PersonRecord(record_id="b-1003", tin="345-67-8901", first_name="Carla", last_name="Garcia",
                 dob="1991-07-21", address="7 Pine Road", city="Peoria", state="IL",
                 zip="61602", extra=(("tax_paid_cents", "410000"),)),
    PersonRecord(record_id="b-1004", tin="456-78-9012", first_name="Dmitri", last_name="Nguyen",
                 dob="1968-02-29", address="301 Elm Drive", city="Chicago", state="IL",
                 zip="60614", extra=(("tax_paid_cents", "2975000"),)),
]

#: The legal basis every subject of the requester's request carries.
CASE = QueryMetadata(tax_periods=("2023", "2024"), statute="26 U.S.C. 6103(i)(2)",
                     reason="locate subject of case 24-117")

#: agency-a's subjects, under its own record ids: two the custodian holds (one of them has
#: moved, which a TIN+DOB rule does not mind), one it does not hold, and one with a
#: placeholder address, which validation refuses before anything is signed or sent.
SUBJECTS = [
    QueryRecord(PersonRecord(record_id="a-1", tin="123-45-6789", first_name="Ann",
                             last_name="Lee", dob="1980-04-12", address="12 Main Street",
                             city="Springfield", state="IL", zip="62701"), CASE),
    QueryRecord(PersonRecord(record_id="a-2", tin="456-78-9012", first_name="Dmitri",
                             last_name="Nguyen", dob="1968-02-29", address="9 Cedar Lane",
                             city="Evanston", state="IL", zip="60201"), CASE),
    QueryRecord(PersonRecord(record_id="a-3", tin="567-89-0123", first_name="Eve",
                             last_name="Brown", dob="1985-09-09", address="55 Lake Street",
                             city="Aurora", state="IL", zip="60505"), CASE),
    QueryRecord(PersonRecord(record_id="a-4", tin="678-90-1234", first_name="Farah",
                             last_name="Patel", dob="1979-12-01", address="Failed to Provide",
                             city="Joliet", state="IL", zip="60432"), CASE),
]
