"""Signing up and in, choosing the organization, roles, and the overview."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.hashers import MD5PasswordHasher
from django.core import mail
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from django.views.debug import SafeExceptionReporterFilter

from accounts.models import Membership, Organization, Role, User
from gymbilling.market.services import listing_create
from metering.models import MICRO
from metering.services import hold_place
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import lots_due_while_a_job_runs

pytestmark = pytest.mark.django_db


def test_a_visitor_is_sent_to_sign_in_and_back(client):
    response = client.get("/dashboard/")

    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/dashboard/"


def test_signing_up_creates_the_account_and_its_organization_unverified_and_signs_in_nobody(
    client,
):
    response = client.post(
        "/signup/", {"email": "Ada@Example.test", "password": "a long and unusual passphrase 3"}
    )

    # then the answer is "check your email", and the account waits for its link
    assert response.status_code == 302 and response["Location"] == reverse("signup-done")
    user = User.objects.get(email="ada@example.test")
    assert user.email_verified is False
    membership = Membership.objects.get(user=user)
    assert membership.role == Role.OWNER and membership.organization.personal
    assert "_auth_user_id" not in client.session
    page = client.get(response["Location"])
    assert page.status_code == 200 and b'data-signup="sent"' in page.content


def test_an_address_whose_local_part_cut_ends_in_a_hyphen_signs_up(client):
    # given an address whose local part, cut to 40 characters for the personal
    # organization's slug, ends in a hyphen ("...-oppenheimer-")
    email = "marie-christine.van-der-berg-oppenheimer-smith@example.test"

    # when it signs up
    response = client.post("/signup/", {"email": email, "password": "a long and unusual pass 3"})

    # then the account and its personal organization are made, with a valid slug
    assert response.status_code == 302 and response["Location"] == reverse("signup-done")
    organization = Membership.objects.get(user__email=email).organization
    assert organization.personal
    assert re.fullmatch(r"marie-christinevan-der-berg-oppenheimer-[0-9a-f]{6}", organization.slug)


def test_an_address_longer_than_an_organization_name_signs_up(client):
    # given a valid address of 213 characters: the personal organization is named by it,
    # and a name holds 200
    email = "a" * 200 + "@example.test"

    # when it signs up
    response = client.post("/signup/", {"email": email, "password": "a long and unusual pass 3"})

    # then the account and its one personal organization are made, named by the address cut
    assert response.status_code == 302 and response["Location"] == reverse("signup-done")
    [organization] = Organization.objects.filter(memberships__user__email=email)
    assert organization.personal
    assert organization.name == "a" * 199 + "\u2026"


@pytest.mark.parametrize(
    "email",
    [
        # NFKC makes each U+FDFA 18 characters, spaces among them: no address, of 259
        "a@" + "\ufdfa" * 14 + ".test",
        # and each U+FB03 "ffi": an address, of 262, past the column's 254
        "a@" + ".".join(["\ufb03" * 21] * 4) + ".test",
    ],
    ids=["no-address", "past-the-column"],
)
def test_an_address_that_normalizes_past_the_column_is_refused_at_sign_up(client, email):
    # when an address, valid as typed, that the stored form (NFKC) stretches signs up
    response = client.post("/signup/", {"email": email, "password": "a long and unusual pass 3"})

    # then the form is drawn again, its address refused, and nothing is made
    assert response.status_code == 400
    assert b'data-error-code="invalid_email"' in response.content
    assert not User.objects.exists() and not Organization.objects.exists()


def sign_up_answer(email: str, password: str, **extra) -> tuple:
    """What a client sees of a sign-up: the answer, its cookies, the page it leads to."""
    visitor = Client()
    visitor.get("/signup/")  # the form, and its CSRF cookie, as a browser has them
    before = {name: morsel.value for name, morsel in visitor.cookies.items()}
    answer = visitor.post("/signup/", {"email": email, "password": password, **extra})
    after = {name: morsel.value for name, morsel in visitor.cookies.items()}
    landing = visitor.get(answer["Location"])
    return (
        (answer.status_code, answer["Location"], answer.content, after == before),
        (landing.status_code, landing.content),
        "_auth_user_id" in visitor.session,
    )


def test_signing_up_with_a_taken_address_answers_as_a_new_one_and_tells_its_owner(
    commit_then_mail,
):
    # given an account, verified, with a password of its own
    owner = UserFactory(email="cleo@example.test", password="the owner's own passphrase 9")
    organizations = Organization.objects.count()

    # when someone signs up with that address (in other capitals), and with a new one
    with commit_then_mail():
        taken = sign_up_answer("Cleo@Example.test", "someone else's passphrase 77")
    with commit_then_mail():
        new = sign_up_answer("dora@example.test", "someone else's passphrase 77")

    # then the two answers are the same to the client, and neither signs anyone in
    assert taken[:3] == new[:3]
    assert taken[2] is False
    # and the taken address's account is as it was, and no account or organization is made
    owner.refresh_from_db()
    assert owner.check_password("the owner's own passphrase 9") and owner.email_verified
    assert User.objects.filter(email__iexact="cleo@example.test").count() == 1
    assert Organization.objects.count() == organizations + 1  # dora's only
    # and each address got one email: the owner, how to sign in or set a new password
    [to_owner, to_dora] = mail.outbox
    assert to_owner.to == ["cleo@example.test"] and to_dora.to == ["dora@example.test"]
    assert "tried to sign up" in to_owner.subject
    assert "http://127.0.0.1:8000/login/" in to_owner.body
    assert "http://127.0.0.1:8000/password-reset/" in to_owner.body
    assert "/verify-email?token=" not in to_owner.body  # verified: nothing to verify
    assert "/verify-email?token=" in to_dora.body


class CountingHasher(MD5PasswordHasher):
    """The test settings' hasher, counting the passwords it hashes (`encoded`)."""

    algorithm = "counted_md5"
    encoded: list[str] = []

    def encode(self, password, salt):
        CountingHasher.encoded.append(password)
        return super().encode(password, salt)


def test_a_taken_address_hashes_the_password_as_a_new_one_does(settings):
    # given a hasher that counts what it hashes (the production one, PBKDF2, takes far
    # longer than the rest of a sign-up: an answer that skipped it would be told apart by
    # its time alone), and an account
    settings.PASSWORD_HASHERS = [f"{__name__}.CountingHasher"]
    UserFactory(email="cleo@example.test")
    CountingHasher.encoded.clear()

    # when the taken address and a new one are signed up
    sign_up_answer("cleo@example.test", "someone else's passphrase 77")
    taken = list(CountingHasher.encoded)
    CountingHasher.encoded.clear()
    sign_up_answer("new@example.test", "another passphrase 78")

    # then each answer hashed its password once, the taken address's too
    assert taken == ["someone else's passphrase 77"]
    assert CountingHasher.encoded == ["another passphrase 78"]


def test_an_address_in_other_unicode_forms_is_the_same_address(
    commit_then_mail,
):
    # given an account
    UserFactory(email="ada@example.test")

    # when someone signs up with its address written with a fullwidth letter, which the
    # sign-in form would read as the same address (NFKC), and a new address so written
    with commit_then_mail():
        taken = sign_up_answer("ada@\uff45xample.test", "someone else's passphrase 77")
    with commit_then_mail():
        new = sign_up_answer("bob@\uff45xample.test", "bob's own passphrase 12")

    # then the first is the taken address: no second account, its owner told
    assert taken[:3] == new[:3]
    assert User.objects.filter(email__iexact="ada@example.test").count() == 1
    assert not User.objects.filter(email__contains="\uff45").exists()
    [to_ada, to_bob] = mail.outbox
    assert to_ada.to == ["ada@example.test"] and "tried to sign up" in to_ada.subject
    # and the second is stored in the form sign-in reads, where its link is sent
    bob = User.objects.get(email="bob@example.test")
    assert to_bob.to == [bob.email] and not bob.email_verified


def test_signing_up_with_a_taken_unverified_address_mails_its_owner_the_link(
    commit_then_mail,
):
    # given an account made by signing up, not verified yet
    with commit_then_mail():
        Client().post("/signup/", {"email": "eve@example.test", "password": "first passphrase 1"})
    mail.outbox.clear()

    # when the address signs up again
    with commit_then_mail():
        again = Client().post(
            "/signup/", {"email": "eve@example.test", "password": "second passphrase 2"}
        )

    # then the answer is the usual one, and the owner's email carries a link that verifies
    assert again.status_code == 302 and again["Location"] == reverse("signup-done")
    [message] = mail.outbox
    assert "tried to sign up" in message.subject
    assert "/verify-email?token=" in message.body
    user = User.objects.get(email="eve@example.test")
    assert user.check_password("first passphrase 1") and not user.email_verified


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [
        ("not-an-email", "a long and unusual passphrase 3", b"invalid_email"),
        ("bob@example.test", "short", b"invalid_password"),
        ("bob@example.test", "12345678901", b"invalid_password"),
    ],
)
def test_a_bad_signup_is_refused_and_creates_nothing(client, email, password, field):
    response = client.post("/signup/", {"email": email, "password": password})

    assert response.status_code == 400
    assert field in response.content
    assert not User.objects.exists() and not Organization.objects.exists()


def test_a_password_like_the_address_is_refused_at_sign_up(client):
    # when someone signs up with their address's name as the password
    response = client.post(
        "/signup/", {"email": "marguerite.duchamp@example.test", "password": "marguerite.duchamp"}
    )

    # then the password validators compare it with the address, as they would with a user
    assert response.status_code == 400
    assert b'data-error-code="invalid_password"' in response.content
    assert b"too similar to the email address" in response.content
    assert not User.objects.exists()


def test_a_signed_in_user_posting_the_sign_up_form_stays_who_they_are(client, member):
    # given someone signed in
    user, _org = member(Role.OWNER)
    users_before = User.objects.count()

    # when the sign-up form is posted from their browser
    response = client.post(
        "/signup/", {"email": "second@example.test", "password": "a long passphrase, 44"}
    )

    # then they are sent to the dashboard, as the form's GET sends them, and nothing changed
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    assert User.objects.count() == users_before
    assert client.session["_auth_user_id"] == str(user.pk)


def test_an_unverified_account_is_refused_sign_in_as_a_wrong_password_is():
    # given an account made by signing up, its address not verified yet
    Client().post("/signup/", {"email": "c@example.test", "password": "a long passphrase, 44"})

    # when it signs in with its password, and someone with a wrong one
    right = Client().post(
        "/login/", {"username": "c@example.test", "password": "a long passphrase, 44"}
    )
    wrong = Client().post("/login/", {"username": "c@example.test", "password": "nope"})

    # then both are refused alike (the emailed link signs it in), and nobody is signed in
    assert right.status_code == wrong.status_code == 200
    refusal = re.compile(rb'data-error-code="invalid_login">[^<]*<')
    assert refusal.search(right.content)[0] == refusal.search(wrong.content)[0]
    assert b"follow the link we emailed you first" in right.content
    assert "_auth_user_id" not in right.wsgi_request.session


def test_signing_in_through_the_form_reaches_the_page_asked_for(client):
    UserFactory(email="d@example.test", password="a long passphrase, 44")

    wrong = client.post("/login/", {"username": "d@example.test", "password": "nope"})
    right = client.post(
        "/login/",
        {"username": "d@example.test", "password": "a long passphrase, 44", "next": "/dashboard/"},
    )

    assert wrong.status_code == 200 and b"invalid_login" in wrong.content
    assert right.status_code == 302 and right["Location"] == "/dashboard/"


def test_signing_in_matches_the_address_in_any_case_as_signing_up_stores_it(client):
    # given someone who signed up with capitals in their address, and verified it
    password = "a long passphrase, 44"
    client.post("/signup/", {"email": "Ada@Example.test", "password": password})
    User.objects.filter(email="ada@example.test").update(email_verified=True)

    # when they sign in with the address exactly as they typed it, or otherwise
    typed = Client().post("/login/", {"username": "Ada@Example.test", "password": password})
    other = Client().post("/login/", {"username": " ADA@example.TEST", "password": password})

    # then both sign in
    assert typed.status_code == 302 and typed["Location"] == reverse("dashboard")
    assert other.status_code == 302


def test_staff_sign_in_to_the_admin_in_any_case():
    User.objects.create_superuser("ops@example.test", "a long passphrase, 44")

    response = Client().post(
        "/admin/login/?next=/admin/",
        {"username": "Ops@Example.TEST", "password": "a long passphrase, 44", "next": "/admin/"},
    )

    assert response.status_code == 302 and response["Location"] == "/admin/"


def test_the_overview_shows_the_chosen_organizations_credits_exactly(client, member, grant):
    user, first = member(Role.MEMBER)
    second = OrganizationFactory(name="Second gym")
    Membership.objects.create(user=user, organization=second, role=Role.BILLING)
    grant(first, 5 * MICRO)
    grant(second, 1_234_567)

    before = client.get("/dashboard/")
    switched = client.post(
        "/dashboard/organization", {"organization": second.slug, "next": "/dashboard/"}
    )
    after = client.get("/dashboard/")

    assert b'data-figure="available">5<' in before.content
    assert switched.status_code == 302 and switched["Location"] == "/dashboard/"
    assert b'data-figure="available">1.234567<' in after.content
    assert b"Second gym" in after.content


def _side_nav_links(page) -> list[str]:
    side = re.search(r'<nav class="side".*?</nav>', page.content.decode(), re.S)
    assert side, "no side navigation on the page"
    return re.findall(r'href="([^"]+)"', side[0])


@pytest.mark.parametrize("role", Role.values)
def test_the_side_navigation_links_exactly_the_pages_the_role_may_open(client, member, role):
    # given every page of the side navigation (an owner is shown them all), and a person
    # in `role` of another organization
    member(Role.OWNER)
    pages = _side_nav_links(client.get("/dashboard/"))
    member(role)

    # when they are shown the navigation, and open every page
    linked = _side_nav_links(client.get("/dashboard/"))
    opened = {path: client.get(path).status_code for path in pages}

    # then what is linked opens, and what is not is refused: no link leads to a 403
    assert {path for path, status in opened.items() if status == 200} == set(linked), opened
    assert {status for path, status in opened.items() if path not in linked} <= {403}
    assert ("/dashboard/invoices" in linked) == (role != Role.MEMBER)
    assert ("/dashboard/billing" in linked) == (role != Role.MEMBER)


def test_switching_to_someone_elses_organization_is_refused(client, member):
    member(Role.OWNER)
    stranger = OrganizationFactory()

    response = client.post("/dashboard/organization", {"organization": stranger.slug})
    page = client.get("/dashboard/")

    assert response.status_code == 404
    assert b'data-error-code="not_found"' in response.content
    assert stranger.name.encode() not in page.content


def test_switching_to_a_slug_with_a_nul_character_is_refused_as_no_such_organization(
    client, member
):
    # given: PostgreSQL refuses to compare text holding NUL (it was a 500)
    _, org = member(Role.OWNER)
    client.raise_request_exception = False

    # when
    response = client.post("/dashboard/organization", {"organization": f"{org.slug}\x00"})
    page = client.get("/dashboard/")

    # then
    assert response.status_code == 404
    assert b'data-error-code="not_found"' in response.content
    assert page.status_code == 200 and org.name.encode() in page.content


def test_the_switch_does_not_redirect_off_the_site(client, member):
    _, org = member(Role.OWNER)

    response = client.post(
        "/dashboard/organization", {"organization": org.slug, "next": "https://evil.test/"}
    )

    assert response["Location"] == "/dashboard/"


def test_a_page_refuses_a_body_over_the_limit_before_reading_it(client, settings):
    # given a valid sign-up padded with a file part: pages take no files, and Django keeps
    # what it reads of one in memory, then in a temporary file, with no limit of its own
    # (DATA_UPLOAD_MAX_MEMORY_SIZE leaves file parts out), so any anonymous form could fill
    # the disk
    padding = SimpleUploadedFile("padding.bin", b"x" * (settings.API_MAX_BODY_BYTES + 1))
    form = {"email": "padded@example.test", "password": "a long and unusual passphrase 3"}

    # when
    response = client.post("/signup/", {**form, "padding": padding})

    # then
    assert response.status_code == 413
    assert b'data-error-code="request_too_large"' in response.content
    assert not User.objects.filter(email="padded@example.test").exists()


def test_a_user_in_no_organization_is_told_so(client):
    user = User.objects.create_user("lonely@example.test", "a long passphrase, 44")
    client.force_login(user)

    response = client.get("/dashboard/")

    assert response.status_code == 403
    assert b'data-error-code="no_organization"' in response.content


def test_the_switcher_on_a_refused_post_leads_back_to_a_page_not_to_the_post(client, member):
    # given a refusal drawn in answer to a POST to an address that takes POSTs only
    member(Role.OWNER)
    refusal = client.post("/dashboard/keys/999999/revoke")
    assert refusal.status_code == 404

    # then its switcher sends the user to the dashboard, not back to that address
    assert b'name="next" value=""' in refusal.content
    page = client.get("/dashboard/keys")
    assert b'name="next" value="/dashboard/keys"' in page.content


def test_the_overage_allowance_shown_is_what_of_it_is_available(client, member, grant):
    # given 5 prepaid credits and a 10-credit overage allowance (burned last), and a
    # running job holding 13 of the 15: the 5 prepaid and 8 of the allowance
    _, org = member(Role.OWNER)
    grant(org, 5 * MICRO)
    grant(org, 10 * MICRO, source="overage", paid=False, resellable=False, priority=1000)
    hold_place(organization=org, amount=13 * MICRO, key="job-overview")

    page = client.get("/dashboard/").content.decode()

    # then 2 are available, and all 2 are the allowance (not the lot's 10 left)
    assert 'data-figure="available">2<' in page
    assert "Of what is available, 2 is your plan" in page


def test_credits_in_escrow_are_marked_so_in_the_lots(client, member, grant):
    # given 100 credits of which 40 are listed on the marketplace
    _, org = member(Role.OWNER)
    grant(org, 100 * MICRO)
    listing_create(seller=org, quantity=40 * MICRO, price_per_1k=300, currency="usd")

    page = client.get("/dashboard/").content.decode()

    assert 'data-figure="available">60<' in page and 'data-figure="escrowed">40<' in page
    rows = lot_rows(page).values()
    assert sorted(("in escrow" in row, ">40<" in row) for row in rows) == [
        (False, False),
        (True, True),
    ]


def test_the_lots_leave_out_what_the_expiry_sweep_will_move(client, member, grant):
    # given lots past their expiry that the sweep has not moved yet: 10 a running job
    # holds 4 of, 10 nothing holds; and 100 that never expire
    _, org = member(Role.OWNER)
    held, _gone, forever = lots_due_while_a_job_runs(org, grant)

    page = client.get("/dashboard/").content.decode()

    # then 100 are available and 4 held, and the lots say the same: the job's 4 of the
    # expired lot, marked expired, and the 100
    assert 'data-figure="available">100<' in page and 'data-figure="held">4<' in page
    rows = lot_rows(page)
    assert set(rows) == {held.pk, forever.pk}
    assert '<td class="num">10</td><td class="num">4</td>' in rows[held.pk]
    assert "data-lot-expired" in rows[held.pk]
    assert '<td class="num">100</td><td class="num">100</td>' in rows[forever.pk]
    assert "data-lot-expired" not in rows[forever.pk]


def lot_rows(page: str) -> dict[int, str]:
    """The overview's table of lots: each row's cells, by the lot's id."""
    rows = re.findall(r'<tr data-lot="(\d+)">(.*?)</tr>', page, re.S)
    return {int(pk): re.sub(r">\s+<", "><", cells) for pk, cells in rows}


@pytest.mark.parametrize(
    ("role", "path"),
    [
        (Role.OWNER, "/dashboard/"),
        (Role.OWNER, "/dashboard/members"),
        (Role.MEMBER, "/dashboard/members"),  # the 403 page
        (Role.OWNER, "/dashboard/members?remove=abc"),  # a refusal
    ],
)
def test_no_dashboard_page_is_kept_by_a_browser_or_proxy(client, member, role, path):
    # given a signed-in member
    member(role)

    # when a page is drawn (a page, a refusal, a 403)
    response = client.get(path)

    # then the browser keeps no copy: after signing out, Back shows nothing
    cache_control = {part.strip() for part in response["Cache-Control"].split(",")}
    assert {"no-store", "no-cache", "must-revalidate", "private"} <= cache_control
    assert "Expires" in response


@pytest.mark.parametrize("path", ["/signup/", "/login/"])
def test_an_error_report_of_signing_up_or_in_hides_the_password(client, path):
    # when a password is posted
    response = client.post(
        path,
        {"email": "ada@example.test", "username": "ada@example.test", "password": "hunter2hunter2"},
    )

    # then what an error report would show of that request (Django's filter) hides it
    shown = SafeExceptionReporterFilter().get_post_parameters(response.wsgi_request)
    assert shown["password"] == SafeExceptionReporterFilter.cleansed_substitute
    assert "hunter2hunter2" not in repr(dict(shown))


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/dashboard/usage?days=7&days=90", "days"),
        ("/dashboard/market?currency=usd&currency=eur", "currency"),
        ("/dashboard/invoices?page=1&page=2", "page"),
        ("/dashboard/keys?revoke=1&revoke=2", "revoke"),
        ("/dashboard/activity?before=5&kind=x&before=9", "before"),
    ],
)
def test_a_dashboard_page_refuses_a_query_parameter_given_twice(client, member, path, param):
    # given a signed-in owner
    _user, organization = member(Role.OWNER)

    # when a page is asked for with a parameter twice (a link built by appending)
    response = client.get(path)

    # then: 400, saying which, in the dashboard's frame, not the page for the last value
    assert response.status_code == 400, response.content
    page = response.content.decode()
    assert 'data-error-code="invalid_request"' in page
    assert f"The query parameter &#x27;{param}&#x27; is given more than once" in page
    assert f'href="{path.split("?")[0]}"' in page  # the way on: the page without its query
    assert organization.name in page
    # while the parameter once draws the page
    once = path.split("&")[0]
    assert client.get(once).status_code == 200


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/login/?next=/dashboard/&next=/dashboard/keys", "next"),
        ("/signup/?next=/a&next=/b", "next"),
        ("/signup/done?next=/a&next=/b", "next"),
        ("/verify-email?token=a&token=b", "token"),
        ("/invitations/accept?token=a&token=b", "token"),
    ],
)
def test_a_page_for_people_signed_out_refuses_a_query_parameter_given_twice(client, path, param):
    # when
    response = client.get(path)

    # then: 400 naming it; the invitation's token is not kept in the session either
    assert response.status_code == 400, response.content
    page = response.content.decode()
    assert 'data-error-code="invalid_request"' in page
    assert f"&#x27;{param}&#x27;" in page
    assert "invitation_token" not in client.session
